//! `/v1/swarms*`: define, read and delete swarms (the logic is [`crate::swarms`]).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use swarm_proto::api::{CreateSwarm, SwarmList, SwarmView};

use super::ApiError;
use crate::node::Node;
use crate::swarms;

/// `POST /v1/swarms`
pub(super) async fn create(
    State(node): State<Arc<Node>>,
    body: Result<Json<CreateSwarm>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let view = swarms::create(&node, req).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// `GET /v1/swarms`
pub(super) async fn list(State(node): State<Arc<Node>>) -> Json<SwarmList> {
    Json(swarms::list(&node))
}

/// `GET /v1/swarms/{name}`
pub(super) async fn get(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Json<SwarmView>, ApiError> {
    Ok(Json(swarms::get(&node, &name)?))
}

/// `DELETE /v1/swarms/{name}`
pub(super) async fn delete(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    swarms::delete(&node, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
