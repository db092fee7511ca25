//! `/v1/tokens*` and `/v1/certs/revoked`: API tokens and revoked certificates (the logic
//! is [`crate::access`]).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use swarm_proto::api::{
    CreateToken, EnrollRequest, EnrollResponse, RevokeCert, RevokedList, TokenList,
};

use super::ApiError;
use crate::access;
use crate::node::Node;

/// `POST /v1/tokens`: `201` with the token, shown this once.
pub(super) async fn create_token(
    State(node): State<Arc<Node>>,
    body: Result<Json<CreateToken>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let created = access::create_token(&node, req).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// `GET /v1/tokens`
pub(super) async fn list_tokens(State(node): State<Arc<Node>>) -> Json<TokenList> {
    Json(access::list_tokens(&node))
}

/// `DELETE /v1/tokens/{token}` (id or name)
pub(super) async fn revoke_token(
    State(node): State<Arc<Node>>,
    Path(token): Path<String>,
) -> Result<StatusCode, ApiError> {
    access::revoke_token(&node, &token).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/certs/revoked`
pub(super) async fn revoke_cert(
    State(node): State<Arc<Node>>,
    body: Result<Json<RevokeCert>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(req) = body?;
    access::revoke_cert(&node, req).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/certs/revoked`
pub(super) async fn list_revoked(State(node): State<Arc<Node>>) -> Json<RevokedList> {
    Json(access::list_revoked(&node))
}

/// `POST /v1/certs/enroll` (enrollment token; leader): a certificate for a new worker.
pub(super) async fn enroll(
    State(node): State<Arc<Node>>,
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let Json(req) = body?;
    Ok(Json(access::enroll(&node, req).await?))
}
