//! Vector memory and the ReasoningBank inside the coordinator.
//!
//! The [`swarm_memory::MemoryStore`] is the second state machine of every replica (next
//! to the task table): writes are [`Op::Memory`] entries in the Raft log, so they are
//! durable, replicated and in every snapshot; reads (search, retrieve, list) are served
//! from the local replica without a Raft round trip.
//!
//! * HTTP (`/v1/memory/*`, `/v1/patterns/*`): JSON in, memory ops or reads out.
//! * Workers: a task submitted with `patterns: k` makes its worker send `Retrieve` over
//!   its QUIC session before running the agent; [`retrieve_for_worker`] embeds the task's
//!   payload text with the built-in embedder and answers from the local replica.
//! * After a task's result commits, [`after_result`] judges the patterns the agent was
//!   given against the outcome ([`MemoryOp::PatternJudge`]) and, when enabled, distils the
//!   task into new patterns ([`MemoryOp::PatternAdd`]).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use swarm_memory::{
    embed_items, CollectionSpec, ConsolidateParams, Distiller, Embedder, HashEmbedder, MemoryOp,
    MetadataFilter, Metric, NewPattern, OpOutcome, Outcome as PatternOutcome, PointWrite,
    RetrieveParams, SearchRequest, TaskSummary,
};
use swarm_proto::worker::PatternHit;
use tracing::{debug, warn};

use crate::api::ApiError;
use crate::node::{now_ms, Node};
use crate::state::{MemoryFault, Op, OpResult};

/// How finished tasks become patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DistillMode {
    /// Only `memory_items` an agent returns in its JSON result.
    #[default]
    AgentItems,
    /// Agent items, plus one rule-based item per finished task.
    Rules,
    /// Agent items, plus items an OpenAI-compatible chat endpoint writes.
    Llm { base_url: String, model: String },
    /// Nothing is distilled.
    Off,
}

/// What the coordinator uses to embed and distil.
pub(crate) struct MemoryService {
    pub(crate) embedder: HashEmbedder,
    distillers: Vec<Box<dyn Distiller>>,
}

impl MemoryService {
    pub(crate) fn new(mode: &DistillMode) -> anyhow::Result<MemoryService> {
        let mut distillers: Vec<Box<dyn Distiller>> = Vec::new();
        if *mode != DistillMode::Off {
            distillers.push(Box::new(swarm_memory::AgentItemsDistiller));
        }
        match mode {
            DistillMode::Rules => distillers.push(Box::new(swarm_memory::RuleDistiller)),
            DistillMode::Llm { base_url, model } => {
                let cfg = swarm_memory::LlmDistillerConfig::new(base_url.clone(), model.clone());
                distillers.push(Box::new(
                    swarm_memory::LlmDistiller::new(cfg)
                        .map_err(|e| anyhow::anyhow!("LLM distiller: {e}"))?,
                ));
            }
            _ => {}
        }
        Ok(MemoryService {
            embedder: HashEmbedder::default(),
            distillers,
        })
    }
}

fn fault(f: MemoryFault) -> ApiError {
    let status = match f.code.as_str() {
        "unknown_collection" | "unknown_pattern" => StatusCode::NOT_FOUND,
        "collection_exists" => StatusCode::CONFLICT,
        "metadata_too_large" | "batch_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError::Coded {
        status,
        code: f.code,
        message: f.message,
    }
}

fn mem_err(e: swarm_memory::MemoryError) -> ApiError {
    fault(MemoryFault::from(e))
}

/// Commit one memory op and return what it did.
async fn write(node: &Node, op: MemoryOp) -> Result<OpOutcome, ApiError> {
    // Refuse what would be refused anyway before it takes a log entry.
    node.table.memory(|m| m.validate(&op)).map_err(mem_err)?;
    let r = node
        .propose(vec![Op::Memory(op)])
        .await
        .map_err(|e| ApiError::from_propose(node, e))?;
    match r.into_iter().next() {
        Some(OpResult::Memory(Ok(o))) => Ok(o),
        Some(OpResult::Memory(Err(f))) => Err(fault(f)),
        other => Err(ApiError::Internal(format!(
            "unexpected memory result {other:?}"
        ))),
    }
}

fn parse_metric(s: &str) -> Result<Metric, ApiError> {
    match s.to_ascii_lowercase().as_str() {
        "cosine" => Ok(Metric::Cosine),
        "l2" | "euclidean" => Ok(Metric::L2),
        "dot" | "ip" => Ok(Metric::Dot),
        other => Err(ApiError::BadRequest(format!(
            "unknown metric {other:?}: one of cosine, l2, dot"
        ))),
    }
}

fn parse_outcome(s: &str) -> Result<PatternOutcome, ApiError> {
    PatternOutcome::parse(s).ok_or_else(|| {
        ApiError::BadRequest(format!("outcome must be `success` or `failure`, got {s:?}"))
    })
}

/// `PUT /v1/memory/{collection}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateCollection {
    dimension: usize,
    #[serde(default = "default_metric")]
    metric: String,
    m: Option<usize>,
    ef_construction: Option<usize>,
    ef_search: Option<usize>,
}

fn default_metric() -> String {
    "cosine".into()
}

pub(crate) async fn create_collection(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    body: Result<Json<CreateCollection>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(c) = body?;
    let mut spec = CollectionSpec::new(c.dimension, parse_metric(&c.metric)?);
    if let Some(m) = c.m {
        spec.m = m;
    }
    if let Some(e) = c.ef_construction {
        spec.ef_construction = e;
    }
    if let Some(e) = c.ef_search {
        spec.ef_search = e;
    }
    write(
        &node,
        MemoryOp::CreateCollection {
            name: name.clone(),
            spec,
            now_ms: now_ms(),
        },
    )
    .await?;
    let info = node
        .table
        .memory(|m| m.collection_info(&name))
        .map_err(mem_err)?;
    Ok((StatusCode::CREATED, Json(info_json(&info))).into_response())
}

fn info_json(i: &swarm_memory::CollectionInfo) -> Value {
    serde_json::to_value(i).unwrap_or(Value::Null)
}

pub(crate) async fn list_collections(State(node): State<Arc<Node>>) -> Json<Value> {
    let list = node.table.memory(|m| m.list_collections());
    Json(json!({ "collections": list.iter().map(info_json).collect::<Vec<_>>() }))
}

pub(crate) async fn get_collection(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let info = node
        .table
        .memory(|m| m.collection_info(&name))
        .map_err(mem_err)?;
    Ok(Json(info_json(&info)))
}

pub(crate) async fn drop_collection(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let o = write(
        &node,
        MemoryOp::DropCollection {
            name,
            now_ms: now_ms(),
        },
    )
    .await?;
    Ok(Json(serde_json::to_value(o).unwrap_or(Value::Null)))
}

/// One point of an upsert: a vector, or a text the built-in embedder turns into one
/// (only for collections of its dimension).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PointIn {
    id: String,
    vector: Option<Vec<f32>>,
    text: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
    ttl_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpsertBody {
    points: Vec<PointIn>,
}

fn vector_of(
    node: &Node,
    vector: Option<Vec<f32>>,
    text: Option<&str>,
) -> Result<Vec<f32>, ApiError> {
    match (vector, text) {
        (Some(v), None) => Ok(v),
        (None, Some(t)) => Ok(node.memory_service().embedder.embed_one(t)),
        _ => Err(ApiError::BadRequest(
            "give either `vector` or `text` (embedded by the built-in embedder)".into(),
        )),
    }
}

pub(crate) async fn upsert(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    body: Result<Json<UpsertBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(b) = body?;
    let mut points = Vec::with_capacity(b.points.len());
    for (i, p) in b.points.into_iter().enumerate() {
        let vector = vector_of(&node, p.vector, p.text.as_deref())
            .map_err(|e| ApiError::BadRequest(format!("points[{i}]: {e}")))?;
        let metadata = match p.metadata {
            None | Some(Value::Null) => "{}".to_string(),
            Some(v @ Value::Object(_)) => v.to_string(),
            Some(_) => {
                return Err(ApiError::BadRequest(format!(
                    "points[{i}]: metadata must be a JSON object"
                )))
            }
        };
        points.push(PointWrite {
            id: p.id,
            vector,
            metadata,
            ttl_ms: p.ttl_ms,
        });
    }
    let o = write(
        &node,
        MemoryOp::Upsert {
            collection: name,
            points,
            now_ms: now_ms(),
        },
    )
    .await?;
    Ok(Json(serde_json::to_value(o).unwrap_or(Value::Null)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteBody {
    ids: Vec<String>,
}

pub(crate) async fn delete_points(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    body: Result<Json<DeleteBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(b) = body?;
    let o = write(
        &node,
        MemoryOp::Delete {
            collection: name,
            ids: b.ids,
            now_ms: now_ms(),
        },
    )
    .await?;
    Ok(Json(serde_json::to_value(o).unwrap_or(Value::Null)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchBody {
    vector: Option<Vec<f32>>,
    text: Option<String>,
    #[serde(default = "default_k")]
    k: usize,
    ef: Option<usize>,
    /// `{"field": value}` (all must equal) or `{"field": [v1, v2]}` (one of).
    filter: Option<Value>,
    /// Exact brute-force search instead of HNSW (for checking recall).
    #[serde(default)]
    exact: bool,
}

fn default_k() -> usize {
    10
}

pub(crate) async fn search(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    body: Result<Json<SearchBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(b) = body?;
    let vector = vector_of(&node, b.vector, b.text.as_deref())?;
    let filter = match &b.filter {
        None | Some(Value::Null) => None,
        Some(v) => Some(MetadataFilter::from_json(v).map_err(mem_err)?),
    };
    let req = SearchRequest {
        vector,
        k: b.k,
        ef: b.ef,
        filter,
        now_ms: now_ms(),
    };
    let hits = node
        .table
        .memory(|m| {
            if b.exact {
                m.search_exact(&name, &req)
            } else {
                m.search(&name, &req)
            }
        })
        .map_err(mem_err)?;
    let hits: Vec<Value> = hits
        .into_iter()
        .map(|h| {
            json!({
                "id": h.id,
                "distance": h.distance,
                "metadata": serde_json::from_str::<Value>(&h.metadata).unwrap_or(Value::Null),
            })
        })
        .collect();
    Ok(Json(json!({ "hits": hits })))
}

/// `POST /v1/patterns` body: patterns to add (embedded by the built-in embedder).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddPatterns {
    items: Vec<PatternIn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatternIn {
    title: String,
    #[serde(default)]
    description: String,
    content: String,
    outcome: String,
    source_task: Option<u64>,
}

pub(crate) async fn add_patterns(
    State(node): State<Arc<Node>>,
    body: Result<Json<AddPatterns>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(b) = body?;
    let mut items = Vec::with_capacity(b.items.len());
    for p in b.items {
        let outcome = parse_outcome(&p.outcome)?;
        let text = format!("{}\n{}\n{}", p.title, p.description, p.content);
        items.push(NewPattern {
            embedding: node.memory_service().embedder.embed_one(&text),
            title: p.title,
            description: p.description,
            content: p.content,
            source_task: p.source_task,
            outcome,
        });
    }
    let o = write(
        &node,
        MemoryOp::PatternAdd {
            items,
            now_ms: now_ms(),
        },
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::to_value(o).unwrap_or(Value::Null)),
    )
        .into_response())
}

pub(crate) async fn list_patterns(State(node): State<Arc<Node>>) -> Json<Value> {
    let items: Vec<Value> = node.table.memory(|m| {
        m.patterns()
            .map(|p| serde_json::to_value(p).unwrap_or(Value::Null))
            .collect()
    });
    Json(json!({ "patterns": items }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetrieveBody {
    query: String,
    #[serde(default = "default_retrieve_k")]
    k: usize,
    /// Only patterns learnt from this outcome.
    outcome: Option<String>,
    mmr_lambda: Option<f64>,
    min_similarity: Option<f64>,
}

fn default_retrieve_k() -> usize {
    5
}

pub(crate) async fn retrieve(
    State(node): State<Arc<Node>>,
    body: Result<Json<RetrieveBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(b) = body?;
    let mut params = RetrieveParams::default();
    if let Some(o) = &b.outcome {
        params.outcome = Some(parse_outcome(o)?);
    }
    if let Some(l) = b.mmr_lambda {
        params.mmr_lambda = l;
    }
    if let Some(s) = b.min_similarity {
        params.min_similarity = s;
    }
    let started = Instant::now();
    let q = node.memory_service().embedder.embed_one(&b.query);
    let items = node
        .table
        .memory(|m| m.retrieve(&q, b.k, now_ms(), &params))
        .map_err(mem_err)?;
    metrics::histogram!("swarm_memory_retrieve_seconds", "via" => "http")
        .record(started.elapsed().as_secs_f64());
    Ok(Json(json!({
        "items": items.iter().map(|r| serde_json::to_value(r).unwrap_or(Value::Null)).collect::<Vec<_>>()
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JudgeBody {
    item_ids: Vec<String>,
    outcome: String,
    task_id: Option<u64>,
}

pub(crate) async fn judge(
    State(node): State<Arc<Node>>,
    body: Result<Json<JudgeBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(b) = body?;
    let o = write(
        &node,
        MemoryOp::PatternJudge {
            task_id: b.task_id,
            item_ids: b.item_ids,
            outcome: parse_outcome(&b.outcome)?,
            now_ms: now_ms(),
        },
    )
    .await?;
    Ok(Json(serde_json::to_value(o).unwrap_or(Value::Null)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConsolidateBody {
    duplicate_similarity: Option<f32>,
    contradiction_similarity: Option<f32>,
    prune_idle_ms: Option<u64>,
    prune_max_uses: Option<u64>,
    prune_max_confidence: Option<f64>,
}

pub(crate) async fn consolidate(
    State(node): State<Arc<Node>>,
    body: Result<Json<ConsolidateBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(b) = body?;
    let mut params = ConsolidateParams::default();
    if let Some(v) = b.duplicate_similarity {
        params.duplicate_similarity = v;
    }
    if let Some(v) = b.contradiction_similarity {
        params.contradiction_similarity = v;
    }
    if let Some(v) = b.prune_idle_ms {
        params.prune_idle_ms = v;
    }
    if let Some(v) = b.prune_max_uses {
        params.prune_max_uses = v;
    }
    if let Some(v) = b.prune_max_confidence {
        params.prune_max_confidence = v;
    }
    let o = write(
        &node,
        MemoryOp::Consolidate {
            params,
            now_ms: now_ms(),
        },
    )
    .await?;
    Ok(Json(serde_json::to_value(o).unwrap_or(Value::Null)))
}

/// Answer a worker's `Retrieve`: embed the query, read the local replica.
pub(crate) fn retrieve_for_worker(
    node: &Node,
    query: &str,
    k: u32,
) -> Result<Vec<PatternHit>, String> {
    let started = Instant::now();
    let q = node.memory_service().embedder.embed_one(query);
    let items = node
        .table
        .memory(|m| m.retrieve(&q, k as usize, now_ms(), &RetrieveParams::default()))
        .map_err(|e| format!("{}: {e}", e.code()))?;
    metrics::histogram!("swarm_memory_retrieve_seconds", "via" => "worker")
        .record(started.elapsed().as_secs_f64());
    Ok(items
        .into_iter()
        .map(|r| PatternHit {
            id: r.item.id,
            title: r.item.title,
            description: r.item.description,
            content: r.item.content,
            outcome: r.item.outcome.as_str().to_string(),
            confidence: r.item.confidence,
            score: r.score,
        })
        .collect())
}

/// What a committed result means for the ReasoningBank.
pub(crate) struct ResultForMemory {
    pub task_id: u64,
    pub agent: String,
    pub payload: Vec<u8>,
    pub succeeded: bool,
    pub output: Option<Vec<u8>>,
    pub error: Option<String>,
    pub patterns_used: Vec<String>,
}

/// After a result committed: judge the patterns the agent used and distil new ones.
/// Best effort and at most once per committed result: a failure is logged, not retried.
pub(crate) async fn after_result(node: Arc<Node>, r: ResultForMemory) {
    let now = now_ms();
    let outcome = if r.succeeded {
        PatternOutcome::Success
    } else {
        PatternOutcome::Failure
    };
    let mut ops = Vec::new();
    if !r.patterns_used.is_empty() {
        ops.push(Op::Memory(MemoryOp::PatternJudge {
            task_id: Some(r.task_id),
            item_ids: r.patterns_used.clone(),
            outcome,
            now_ms: now,
        }));
    }
    let service = node.memory_service();
    if !service.distillers.is_empty() {
        // Parse the output only when it can carry `memory_items`: results are on the hot
        // path and may be large.
        let result = r
            .output
            .as_deref()
            .filter(|o| o.windows(12).any(|w| w == b"memory_items"))
            .and_then(|o| serde_json::from_slice::<Value>(o).ok());
        let summary = TaskSummary {
            task_id: r.task_id,
            agent: r.agent.clone(),
            payload_summary: String::from_utf8_lossy(&r.payload)
                .chars()
                .take(200)
                .collect(),
            outcome,
            error: r.error.clone(),
            result,
        };
        let mut items = Vec::new();
        for d in &service.distillers {
            match d.distill(&summary).await {
                Ok(mut v) => items.append(&mut v),
                Err(e) => {
                    warn!(task = r.task_id, distiller = d.name(), error = %e, "distillation failed")
                }
            }
        }
        match embed_items(&service.embedder as &dyn Embedder, &items).await {
            Ok(patterns) if !patterns.is_empty() => ops.push(Op::Memory(MemoryOp::PatternAdd {
                items: patterns,
                now_ms: now,
            })),
            Ok(_) => {}
            Err(e) => warn!(task = r.task_id, error = %e, "embedding distilled items failed"),
        }
    }
    if ops.is_empty() {
        return;
    }
    match node.propose(ops).await {
        Ok(results) => {
            for res in results {
                if let OpResult::Memory(Err(f)) = res {
                    debug!(task = r.task_id, code = %f.code, message = %f.message, "memory op after a result refused");
                }
            }
        }
        Err(e) => debug!(task = r.task_id, error = %e, "memory ops after a result not committed"),
    }
}
