//! Any node accepts any request; what needs the leader runs there.
//!
//! * **Forwarding** ([`leader_only`]): a request that needs the leader and arrives at a
//!   follower is replayed against the leader's API with the same method, path, query,
//!   body and principal (over HTTPS the follower's certificate vouches for the
//!   principal it names; over loopback HTTP the client's token goes along) (through [`crate::cluster::PeerHttp`]), and the leader's answer is
//!   returned as is. A forwarded request is marked ([`FORWARDED_BY`]) and is never
//!   forwarded twice: a node that receives one and is not the leader (leadership moved
//!   meanwhile) answers `503 not_leader` with the leader it knows, and clients retry.
//! * **Event streams** (`/v1/tasks/{id}/events`, see [`super::live`]): relayed piece by
//!   piece through [`crate::cluster::PeerHttp::open`], never held whole.
//! * **Streams** ([`leader_here`]): backups and restores are not forwarded (a forward
//!   would hold the whole stream in this node's memory); a follower answers
//!   `503 not_leader` naming the leader, and the client goes there itself.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, Request, State};
use axum::http::{self, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::node::Node;

/// Header naming the node that forwarded a request to the leader.
pub const FORWARDED_BY: &str = "x-swarm-forwarded-by";

/// Middleware for routes that must run on the leader: run here if leading, else forward.
pub(super) async fn leader_only(
    State(node): State<Arc<Node>>,
    req: Request,
    next: Next,
) -> Response {
    if node.is_leader() {
        return next.run(req).await;
    }
    forward_or_refuse(&node, req).await
}

/// For streamed requests (backups, restores): run here if leading, else refuse with
/// `not_leader` naming the leader, where the client goes itself (a forward would hold
/// the whole stream in this node's memory).
pub(super) async fn leader_here(
    State(node): State<Arc<Node>>,
    req: Request,
    next: Next,
) -> Response {
    if node.is_leader() {
        return next.run(req).await;
    }
    ApiError::NotLeader {
        leader_api: node
            .leader()
            .filter(|(id, _)| *id != node.id())
            .map(|(_, a)| a.api_addr),
    }
    .into_response()
}

/// Whether a view that is best answered by the leader (status, cluster) goes there: this
/// node does not lead, knows who does, and the request was not forwarded already.
/// Otherwise the node answers with its own view.
pub(super) fn leader_answers(node: &Node, req: &Request) -> bool {
    !node.is_leader() && !req.headers().contains_key(FORWARDED_BY) && node.leader().is_some()
}

/// Replay `req` against the leader, or refuse with `not_leader` when that is impossible
/// or the request was forwarded already.
pub(super) async fn forward_or_refuse(node: &Node, req: Request) -> Response {
    let leader = node.leader().filter(|(id, _)| *id != node.id());
    match leader {
        Some((_, addr)) if !req.headers().contains_key(FORWARDED_BY) => {
            forward(node, &addr.api_addr, req).await
        }
        other => ApiError::NotLeader {
            leader_api: other.map(|(_, a)| a.api_addr),
        }
        .into_response(),
    }
}

/// Who a request to the leader is for. The client was authenticated here: over HTTPS
/// this node's certificate vouches for the principal it names and the client's token
/// stays here; over plain HTTP (loopback only) the token goes along.
pub(super) fn vouch(
    node: &Node,
    parts: &http::request::Parts,
    mut rb: http::request::Builder,
) -> http::request::Builder {
    if !node.config().api.tls {
        if let Some(v) = parts.headers.get(header::AUTHORIZATION) {
            rb = rb.header(header::AUTHORIZATION, v.clone());
        }
    } else if let Some(v) = parts
        .extensions
        .get::<crate::access::Principal>()
        .and_then(super::auth::encode)
    {
        rb = rb.header(super::auth::PRINCIPAL, v);
    }
    rb
}

async fn forward(node: &Node, leader_api: &str, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map_or_else(|| parts.uri.clone(), |o| o.0.clone());
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let limit = node.body_limit();
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::PayloadTooLarge(format!("request body: {e}")).into_response();
        }
    };
    let url = node.peer_api_url(leader_api, path);
    // Long enough for the longest `?wait=` the leader allows.
    let timeout = node.config().limits.max_wait + Duration::from_secs(30);
    let mut rb = http::Request::builder()
        .method(parts.method.clone())
        .uri(&url)
        .header(FORWARDED_BY, node.id().to_string());
    rb = vouch(node, &parts, rb);
    for h in [header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(v) = parts.headers.get(&h) {
            rb = rb.header(h, v.clone());
        }
    }
    let fwd = match rb.body(body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::Internal(format!("cannot forward to {url}: {e}")).into_response()
        }
    };
    metrics::counter!("swarm_api_forwarded_total").increment(1);
    let resp = match node.peer_http().send(fwd, timeout).await {
        Ok(r) => r,
        Err(e) => {
            return ApiError::Unavailable(format!(
            "this node is not the leader and forwarding to the leader at {leader_api} failed: {e}"
        ))
            .into_response()
        }
    };
    let (head, bytes) = resp.into_parts();
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = head.status;
    if let Some(ct) = head.headers.get(header::CONTENT_TYPE) {
        out.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
    }
    out
}

/// Relay the leader's event stream for this request (SSE), piece by piece as it comes;
/// this node holds nothing of it. Refused (`not_leader`) for a request that was relayed
/// already.
pub(super) async fn relay_stream(node: &Node, req: Request) -> Result<Response, ApiError> {
    let Some((_, leader)) = node.leader().filter(|(l, _)| *l != node.id()) else {
        return Err(ApiError::NotLeader { leader_api: None });
    };
    if req.headers().contains_key(FORWARDED_BY) {
        return Err(ApiError::NotLeader {
            leader_api: Some(leader.api_addr),
        });
    }
    let (parts, _) = req.into_parts();
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map_or_else(|| parts.uri.clone(), |o| o.0.clone());
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let url = node.peer_api_url(&leader.api_addr, path);
    let mut rb = axum::http::Request::builder()
        .method("GET")
        .uri(&url)
        .header(FORWARDED_BY, node.id().to_string());
    rb = vouch(node, &parts, rb);
    for h in [
        header::ACCEPT,
        header::HeaderName::from_static("last-event-id"),
    ] {
        if let Some(v) = parts.headers.get(&h) {
            rb = rb.header(h, v.clone());
        }
    }
    let fwd = rb
        .body(Bytes::new())
        .map_err(|e| ApiError::Internal(format!("cannot relay to {url}: {e}")))?;
    metrics::counter!("swarm_api_forwarded_total").increment(1);
    let resp = node
        .peer_http()
        .open(fwd, Duration::from_secs(10))
        .await
        .map_err(|e| {
            ApiError::Unavailable(format!(
                "this node is not the leader and relaying the leader's stream at {} failed: {e}",
                leader.api_addr
            ))
        })?;
    let (head, body) = resp.into_parts();
    let mut out = Response::new(Body::from_stream(body));
    *out.status_mut() = head.status;
    for h in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(v) = head.headers.get(&h) {
            out.headers_mut().insert(h, v.clone());
        }
    }
    Ok(out)
}
