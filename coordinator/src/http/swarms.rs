//! `/v1/swarms*`: define, read and delete swarms (the logic is [`crate::swarms`]).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use swarm_proto::api::{CreateSwarm, SetBudget, SwarmList, SwarmUsageView, SwarmView, UsageReport};

use super::auth::check_swarm;
use super::ApiError;
use crate::access::Principal;
use crate::node::Node;
use crate::swarms;

/// `POST /v1/swarms`
pub(super) async fn create(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    body: Result<Json<CreateSwarm>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    check_swarm(&p, &req.name)?;
    let view = swarms::create(&node, req).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// `GET /v1/swarms`
pub(super) async fn list(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
) -> Json<SwarmList> {
    let mut list = swarms::list(&node);
    list.swarms.retain(|s| p.may_use_swarm(&s.name));
    Json(list)
}

/// `GET /v1/swarms/{name}`
pub(super) async fn get(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<SwarmView>, ApiError> {
    check_swarm(&p, &name)?;
    Ok(Json(swarms::get(&node, &name)?))
}

/// `PUT /v1/swarms/{name}/budget`
pub(super) async fn set_budget(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: Result<Json<SetBudget>, JsonRejection>,
) -> Result<Json<SwarmUsageView>, ApiError> {
    let Json(req) = body?;
    check_swarm(&p, &name)?;
    Ok(Json(swarms::set_budget(&node, &name, req.tokens).await?))
}

/// `GET /v1/usage`: a token limited to swarms sees only theirs.
pub(super) async fn usage(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
) -> Json<UsageReport> {
    let mut report = swarms::usage(&node);
    report.swarms.retain(|s| p.may_use_swarm(&s.swarm));
    Json(report)
}

/// `DELETE /v1/swarms/{name}`
pub(super) async fn delete(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_swarm(&p, &name)?;
    swarms::delete(&node, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
