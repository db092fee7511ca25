//! `/v1/limits*`: set, read and delete the named concurrency and rate limits (the logic
//! is [`crate::flow_limits`]). Limits are cluster-wide: changing them needs a token not
//! limited to swarms.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use swarm_proto::api::{LimitList, LimitView, SetLimit};

use super::ApiError;
use crate::flow_limits;
use crate::node::Node;

/// `GET /v1/limits`
pub(super) async fn list(State(node): State<Arc<Node>>) -> Json<LimitList> {
    Json(flow_limits::list(&node))
}

/// `GET /v1/limits/{name}`
pub(super) async fn get(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Json<LimitView>, ApiError> {
    Ok(Json(flow_limits::get(&node, &name)?))
}

/// `PUT /v1/limits/{name}`
pub(super) async fn set(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    body: Result<Json<SetLimit>, JsonRejection>,
) -> Result<Json<LimitView>, ApiError> {
    let Json(req) = body?;
    Ok(Json(flow_limits::set(&node, &name, req).await?))
}

/// `DELETE /v1/limits/{name}`
pub(super) async fn delete(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    flow_limits::delete(&node, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
