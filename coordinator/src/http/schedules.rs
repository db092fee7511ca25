//! `/v1/schedules*`: define, read, pause, resume and delete schedules (the logic is
//! [`crate::schedules`]). A token limited to swarms sees and changes only the schedules
//! whose tasks run in its swarms.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use swarm_proto::api::{CreateSchedule, ScheduleList, ScheduleView};

use super::auth::check_swarm;
use super::ApiError;
use crate::access::Principal;
use crate::node::Node;
use crate::schedules;

/// `POST /v1/schedules`
pub(super) async fn create(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    body: Result<Json<CreateSchedule>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let swarm = req
        .task
        .swarm
        .clone()
        .unwrap_or_else(|| swarm_topology::DEFAULT_SWARM_NAME.to_string());
    check_swarm(&p, &swarm)?;
    let view = schedules::create(&node, req).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// `GET /v1/schedules`
pub(super) async fn list(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
) -> Json<ScheduleList> {
    let mut list = schedules::list(&node);
    list.schedules.retain(|s| p.may_use_swarm(&s.swarm));
    Json(list)
}

/// `GET /v1/schedules/{name}`
pub(super) async fn get(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    check_swarm(&p, &schedules::swarm_of(&node, &name)?)?;
    Ok(Json(schedules::get(&node, &name)?))
}

/// `DELETE /v1/schedules/{name}`
pub(super) async fn delete(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_swarm(&p, &schedules::swarm_of(&node, &name)?)?;
    schedules::delete(&node, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/schedules/{name}/pause`
pub(super) async fn pause(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    check_swarm(&p, &schedules::swarm_of(&node, &name)?)?;
    Ok(Json(schedules::set_paused(&node, &name, true).await?))
}

/// `POST /v1/schedules/{name}/resume`
pub(super) async fn resume(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    check_swarm(&p, &schedules::swarm_of(&node, &name)?)?;
    Ok(Json(schedules::set_paused(&node, &name, false).await?))
}
