//! `/v1/*` requires `Authorization: Bearer <token>`, compared in constant time, or a
//! coordinator certificate presented over HTTPS.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::listen::PeerCert;
use super::ApiError;
use crate::node::Node;

/// Middleware: `401 unauthorized` (with `WWW-Authenticate: Bearer`) unless the request
/// carries this cluster's token, or comes over HTTPS from a coordinator of this cluster
/// (its certificate verified in the handshake: a follower forwarding a request it
/// authenticated, or a peer asking for this node's report).
pub(super) async fn require_token(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if req
        .extensions()
        .get::<PeerCert>()
        .is_some_and(|p| p.0.role == swarm_transport::Role::Coordinator)
    {
        return next.run(req).await;
    }
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
