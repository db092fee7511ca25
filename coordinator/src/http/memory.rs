//! `/v1/memory/*` (vector collections) and `/v1/patterns/*` (the ReasoningBank): JSON in,
//! JSON out (the logic is [`crate::memory`]). Writes need the leader; reads are served by
//! this node's replica.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use swarm_memory::{CollectionInfo, OpOutcome};

use super::ApiError;
use crate::memory::{
    self, AddPatterns, ConsolidateBody, CreateCollection, DeleteBody, JudgeBody, RetrieveBody,
    SearchBody, UpsertBody,
};
use crate::node::Node;

fn info_json(i: &CollectionInfo) -> Value {
    serde_json::to_value(i).unwrap_or(Value::Null)
}

fn outcome_json(o: OpOutcome) -> Json<Value> {
    Json(serde_json::to_value(o).unwrap_or(Value::Null))
}

/// `PUT /v1/memory/{collection}`
pub(super) async fn create_collection(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    body: Result<Json<CreateCollection>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(c) = body?;
    let info = memory::create_collection(&node, name, c).await?;
    Ok((StatusCode::CREATED, Json(info_json(&info))).into_response())
}

/// `GET /v1/memory`
pub(super) async fn list_collections(State(node): State<Arc<Node>>) -> Json<Value> {
    let list = memory::list_collections(&node);
    Json(json!({ "collections": list.iter().map(info_json).collect::<Vec<_>>() }))
}

/// `GET /v1/memory/{collection}`
pub(super) async fn get_collection(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let info = memory::get_collection(&node, &name)?;
    Ok(Json(info_json(&info)))
}

/// `DELETE /v1/memory/{collection}`
pub(super) async fn drop_collection(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(outcome_json(memory::drop_collection(&node, name).await?))
}

/// `POST /v1/memory/{collection}/points`
pub(super) async fn upsert(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    body: Result<Json<UpsertBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(b) = body?;
    Ok(outcome_json(memory::upsert(&node, name, b).await?))
}

/// `POST /v1/memory/{collection}/delete`
pub(super) async fn delete_points(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    body: Result<Json<DeleteBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(b) = body?;
    Ok(outcome_json(memory::delete_points(&node, name, b).await?))
}

/// `POST /v1/memory/{collection}/search`
pub(super) async fn search(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    body: Result<Json<SearchBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(b) = body?;
    let hits: Vec<Value> = memory::search(&node, &name, b)
        .await?
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

/// `POST /v1/patterns`
pub(super) async fn add_patterns(
    State(node): State<Arc<Node>>,
    body: Result<Json<AddPatterns>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(b) = body?;
    let o = memory::add_patterns(&node, b).await?;
    Ok((StatusCode::CREATED, outcome_json(o)).into_response())
}

/// `GET /v1/patterns` query.
#[derive(Debug, serde::Deserialize)]
pub(super) struct PatternsQuery {
    /// Only the `limit` most trusted patterns (all when absent).
    limit: Option<usize>,
}

/// `GET /v1/patterns`: `{"patterns": [...], "total": n}`.
pub(super) async fn list_patterns(
    State(node): State<Arc<Node>>,
    Query(q): Query<PatternsQuery>,
) -> Json<Value> {
    let (patterns, total) = memory::list_patterns(&node, q.limit);
    Json(json!({ "patterns": patterns, "total": total }))
}

/// `POST /v1/patterns/retrieve`
pub(super) async fn retrieve(
    State(node): State<Arc<Node>>,
    body: Result<Json<RetrieveBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(b) = body?;
    let items = memory::retrieve(&node, b).await?;
    Ok(Json(json!({
        "items": items.iter().map(|r| serde_json::to_value(r).unwrap_or(Value::Null)).collect::<Vec<_>>()
    })))
}

/// `POST /v1/patterns/judge`
pub(super) async fn judge(
    State(node): State<Arc<Node>>,
    body: Result<Json<JudgeBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(b) = body?;
    Ok(outcome_json(memory::judge(&node, b).await?))
}

/// `POST /v1/patterns/consolidate`
pub(super) async fn consolidate(
    State(node): State<Arc<Node>>,
    body: Result<Json<ConsolidateBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(b) = body?;
    Ok(outcome_json(memory::consolidate(&node, b).await?))
}
